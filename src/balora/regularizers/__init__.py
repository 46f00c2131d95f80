"""BA-LoRA's output-space regularisers: pure formulas (eq. 4-7, 9-12) and the chunked token losses."""
