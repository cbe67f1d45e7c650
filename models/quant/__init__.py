"""Low-bit weights: the NF4/FP4 codec (:mod:`.nf4`), the 4-bit linear layer (:mod:`.linear4bit`), model-wide
conversion and reports (:mod:`.convert`) and the Triton dequantize kernel beside its torch reference
(:mod:`.triton_dequant`)."""

from models.quant.convert import (
    dequantize_model,
    hf_4bit_storage_bytes,
    linear_weight_report,
    quantize_model,
    quantized_storage_bytes,
)
from models.quant.linear4bit import Linear4bit
from models.quant.nf4 import (
    DOUBLE_QUANT_BLOCK_SIZE,
    FP4_TABLE,
    NF4_TABLE,
    QuantState,
    auto_compute_dtype,
    code_table,
    dequantize_4bit,
    dequantize_absmax,
    dequantize_packed,
    dynamic_map_8bit,
    encode_4bit,
    native_bf16,
    pack_4bit,
    quantize_4bit,
    quantize_absmax,
    resolve_compute_dtype,
    resolve_double_quant,
    unpack_4bit,
)

__all__ = [
    "DOUBLE_QUANT_BLOCK_SIZE", "FP4_TABLE", "auto_compute_dtype", "hf_4bit_storage_bytes", "native_bf16",
    "NF4_TABLE", "Linear4bit", "QuantState", "code_table", "dequantize_4bit",
    "dequantize_absmax", "dequantize_model", "dequantize_packed", "dynamic_map_8bit", "encode_4bit",
    "linear_weight_report", "pack_4bit", "quantize_4bit", "quantize_absmax", "quantize_model",
    "quantized_storage_bytes", "resolve_compute_dtype", "resolve_double_quant", "unpack_4bit",
]
