"""The models the project builds itself, by recipe name: one list, read by the config's validation,
the builders and the CLI."""

TINY_TEACHER = "tiny-teacher"  # cousins/models.py: a ~1M-parameter Llama built offline
TINY_STUDENT = "tiny-student"  # cousins/student.py: a smaller Llama trained on a committed run

# Quantized cousins made from the original's weights (cousins/quantize.py).
QUANT_RECIPES: dict[str, str] = {
    "rtn-int8": "fake-quant: decoder Linear weights rounded to a symmetric per-output-channel int8 grid "
                "(scale = max|w|/127, 255 levels), stored dequantized as the source dtype",
    "rtn-int4": "fake-quant: decoder Linear weights rounded to a symmetric per-output-channel int4 grid "
                "(scale = max|w|/7, 15 levels), stored dequantized as the source dtype",
    "w8a8-int8": "compressed-tensors W8A8 preset: int8 weights (per-channel symmetric, min-max) + dynamic "
                 "per-token int8 activations; all Linear layers except lm_head",
    "fp8-dynamic": "compressed-tensors FP8_DYNAMIC preset: fp8 e4m3 weights (per-channel symmetric, min-max) "
                   "+ dynamic per-token fp8 activations; all Linear layers except lm_head",
}

MODEL_RECIPES = (TINY_TEACHER,)  # model.build
COUSIN_RECIPES = (*QUANT_RECIPES, TINY_STUDENT)  # cousins.NAME.build
