"""Loading a checkpoint: safetensors files read and written by hand (`safetensors`), a Hugging Face
model folder (`checkpoint`), the weights in fp32 or FP8 streamed to their devices (`loader`) by a plan
over the GPUs (`placement`), the tokenizer (`tokenizer`), a random-weights toy checkpoint in the released
DeepSeek-V3.2 layout (`random_checkpoint`) and one with the released dimensions (`synthetic_checkpoint`)."""
