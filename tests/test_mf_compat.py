"""Coming from moshi-finetune: its schedule, embedding training, configs and checkpoints."""

import json
import shutil
import warnings

import pytest
import torch

from finetune.optim import OneCycleSchedule, onecycle_factor

# ---------------------------------------------------------------- the one-cycle schedule


@pytest.mark.parametrize("total, pct_start", [(100, 0.05), (37, 0.3), (20, 0.1), (7, 0.05)])
def test_onecycle_matches_torch_onecycle_lr_and_beta1(total, pct_start):
    """Reference: torch's own OneCycleLR, as moshi-finetune builds it (max_lr, total_steps, pct_start)."""

    def opt():
        ps = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
        return torch.optim.AdamW(
            [{"params": [ps[0]], "lr": 1e-3}, {"params": [ps[1]], "lr": 5e-3}], betas=(0.9, 0.95)
        )

    ref_opt, our_opt = opt(), opt()
    ref = torch.optim.lr_scheduler.OneCycleLR(
        ref_opt, max_lr=[1e-3, 5e-3], total_steps=total, pct_start=pct_start
    )
    ours = OneCycleSchedule(our_opt, total, pct_start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler.step() without optimizer.step(): on purpose here
        for step in range(total):
            for g_ref, g_our in zip(ref_opt.param_groups, our_opt.param_groups):
                assert g_our["lr"] == pytest.approx(g_ref["lr"], rel=1e-12), step
                assert g_our["betas"][0] == pytest.approx(g_ref["betas"][0], rel=1e-12), step
                assert g_our["betas"][1] == g_ref["betas"][1] == 0.95
            ref.step()
            ours.step()


def test_onecycle_where_torch_divides_by_zero_starts_at_the_peak():
    # 20 steps, pct_start 0.05: the rise ends at step 0.05 * 20 - 1 = 0 (torch raises ZeroDivisionError).
    assert onecycle_factor(0, 20, 0.05) == 1.0
    assert onecycle_factor(19, 20, 0.05) == pytest.approx(1 / 25 / 1e4)
    assert onecycle_factor(1, 20, 0.05) < 1.0


def test_onecycle_schedule_resumes_exactly(tmp_path):
    from test_train import losses, tiny_cfg

    from finetune.checkpointing import list_checkpoints
    from finetune.trainer import train

    over = {"optim.schedule": "onecycle", "optim.pct_start": 0.3}
    train(tiny_cfg(tmp_path / "a", **over))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_000006")
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "b" / "metrics.jsonl").write_text(
        "".join(x + "\n" for x in lines if json.loads(x)["step"] <= 3)
    )
    train(tiny_cfg(tmp_path / "b", **over))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    for s in range(4, 7):
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-6)
    state = torch.load(list_checkpoints(tmp_path / "b")[-1][1] / "trainer_state.pt", weights_only=True)
    betas = {g["betas"][0] for g in state["optimizer"]["param_groups"]}
    assert betas != {0.9}  # beta1 follows the cycle, not optim.betas[0]


# ---------------------------------------------------------------- lora.train_embeddings (ft_embed)


def test_train_embeddings_trains_the_tables_and_exports_them_beside_the_adapters(tmp_path):
    from moshi.models import loaders
    from safetensors.torch import load_file
    from test_train import final_weights, tiny_cfg

    from finetune.checkpointing import list_checkpoints
    from finetune.trainer import train

    train(tiny_cfg(tmp_path / "e", max_steps=2, finetune="lora", **{"lora.train_embeddings": True}))
    trained = final_weights(tmp_path / "e")
    tables = {"text_emb.weight", "emb.0.weight", "depformer_text_emb.weight", "depformer_emb.0.weight"}
    assert tables <= trained.keys()
    assert not any(".frozen_W." in k for k in trained)  # the Linears themselves stay frozen
    moshi_dir = list_checkpoints(tmp_path / "e")[-1][1] / "moshi"
    lora = load_file(str(moshi_dir / "lora.safetensors"))
    for k in tables:
        torch.testing.assert_close(lora[k], trained[k])
    info = loaders.CheckpointInfo.from_hf_repo(
        "local/none",
        moshi_weights=moshi_dir / "model.safetensors",
        mimi_weights=moshi_dir / "model.safetensors",
        tokenizer=moshi_dir / "config.json",
        config_path=moshi_dir / "config.json",
        lora_weights=moshi_dir / "lora.safetensors",
    )
    loaded = info.get_moshi(device="cpu", dtype=torch.float32)
    torch.testing.assert_close(loaded.text_emb.weight, trained["text_emb.weight"])
