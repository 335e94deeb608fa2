//! Model families and their loaders (GGUF, safetensors), tokenizers and chat templates.
