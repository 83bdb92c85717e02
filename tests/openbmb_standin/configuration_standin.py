"""Stand-in for OpenBMB's MiniCPM-V configuration (test remote code; written for this project)."""

from transformers import Qwen2Config


class StandInConfig(Qwen2Config):
    model_type = "minicpmv"

    def __init__(self, query_num=4, patch_size=14, slice_config=None, vision_config=None, batch_vision_input=True,
                 table_layout="columns-first", **kwargs):
        self.query_num = query_num
        self.patch_size = patch_size
        self.slice_config = dict(slice_config or {"max_slice_nums": 9, "patch_size": patch_size, "scale_resolution": 448})
        self.vision_config = dict(vision_config or {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                    "num_attention_heads": 2, "image_size": 112, "patch_size": patch_size})
        self.batch_vision_input = batch_vision_input
        self.table_layout = table_layout  # "rows-first" builds the position table the wrong way round (a test's broken checkpoint)
        super().__init__(**kwargs)
