"""One module per model family, as transformers keeps `models/<family>/`.

Each module defines one `consumers.Tail` subclass; `consumers.registry` maps a transformers
`model_type` to it (and accepts families from user code). Encoders: bert, roberta, distilbert,
deberta_v2, mpnet, t5. Decoders: gpt2, and the rotary decoders sharing `decoder.DecoderTail`
(llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3). Modules are imported on first use.
"""
