"""The models the project builds itself, by recipe name: one list, read by the config's validation,
the builders and the CLI."""

TINY_TEACHER = "tiny-teacher"  # cousins/family/models.py: a ~1M-parameter Llama built offline
TINY_STUDENT = "tiny-student"  # cousins/family/student.py: a smaller Llama trained on a committed run
REALISTIC_TEACHER = "realistic-teacher"  # cousins/family/realistic.py: a Qwen2-shaped teacher, ~110k vocabulary, padded head
REALISTIC_STUDENT = "realistic-student"  # cousins/family/realistic.py: a smaller Qwen2 on the same lessons, padded otherwise

# Quantized cousins made from the original's weights (cousins/family/quantize.py).
QUANT_RECIPES: dict[str, str] = {
    "rtn-int8": "fake-quant: decoder Linear weights rounded to a symmetric per-output-channel int8 grid "
                "(scale = max|w|/127, 255 levels), stored dequantized as the source dtype",
    "rtn-int4": "fake-quant: decoder Linear weights rounded to a symmetric per-output-channel int4 grid "
                "(scale = max|w|/7, 15 levels), stored dequantized as the source dtype",
    "w8a8-int8": "compressed-tensors W8A8 preset: int8 weights (per-channel symmetric, min-max) + dynamic "
                 "per-token int8 activations; all Linear layers except lm_head",
    "fp8-dynamic": "compressed-tensors FP8_DYNAMIC preset: fp8 e4m3 weights (per-channel symmetric, min-max) "
                   "+ dynamic per-token fp8 activations; all Linear layers except lm_head",
    # Made by llm-compressor's own oneshot in its venv (cousins/family/llmc.py), calibrated on 32 lessons.
    "llmc-w8a8-int8": "llm-compressor oneshot, QuantizationModifier W8A8: int8 weights per channel + dynamic "
                      "per-token int8 activations (compressed-tensors int-quantized); lm_head kept",
    "llmc-fp8-dynamic": "llm-compressor oneshot, QuantizationModifier FP8_DYNAMIC: fp8 e4m3 weights per channel "
                        "+ dynamic per-token fp8 activations (float-quantized); lm_head kept",
    "llmc-w4a16": "llm-compressor oneshot, QuantizationModifier W4A16: int4 weights, symmetric groups of 128, "
                  "round-to-nearest, 16-bit activations (pack-quantized); lm_head kept",
    "llmc-gptq-w4a16": "llm-compressor oneshot, GPTQModifier W4A16: int4 weights in groups of 128 chosen by GPTQ "
                       "on the calibration activations (pack-quantized); lm_head kept",
    "llmc-awq-w4a16": "llm-compressor oneshot, AWQModifier W4A16_ASYM: activation-aware scales then asymmetric "
                      "int4 groups of 128 (pack-quantized); lm_head kept",
    "llmc-w8a16": "llm-compressor oneshot, QuantizationModifier W8A16: int8 weights per channel, 16-bit "
                  "activations (pack-quantized); lm_head kept. GPU engines only: vLLM's CPU build refuses it",
}

MODEL_RECIPES = (TINY_TEACHER, REALISTIC_TEACHER)  # model.build
COUSIN_RECIPES = (*QUANT_RECIPES, TINY_STUDENT, REALISTIC_STUDENT)  # cousins.NAME.build
