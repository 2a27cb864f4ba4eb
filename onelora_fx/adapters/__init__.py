"""Adapters as files and as data: onelora_fx's own safetensors files (:mod:`.files`),
the PEFT LoRA format (:mod:`.peft`), many adapters in one batch (:mod:`.stack`), and
adapter-sized ``Trainer`` checkpoints (:mod:`.trainer`)."""
