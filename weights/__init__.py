"""Loading a checkpoint: safetensors files read and written by hand (`safetensors`), a Hugging Face
model folder (`checkpoint`), the tokenizer (`tokenizer`) and a random-weights toy checkpoint in the
released DeepSeek-V3.2 layout (`random_checkpoint`)."""
