"""Running a fine-tuned model: streaming inference from a checkpoint (:mod:`.inference`) and the
conversation server speaking moshi's websocket protocol (:mod:`.server`)."""
