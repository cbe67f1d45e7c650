"""Parameter-efficient adapters: LoRA, Nested LoRA (slow + fast), SEMA mixture of adapters, Skip2-LoRA."""
