"""Tiny random checkpoints of the transformers-native families, built offline for the tests.

Each builder makes a character-level tokenizer with the family's special tokens and chat template,
the family's processor (PIL image processor) and a random model from its config class (hidden 32-64,
two layers, 32x32 images). ``save(name, folder)`` writes a checkpoint folder ``--model`` can load.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from bench.models.hf import image_only, register_image_only_processors

IMAGE_SIZE = 32
TINY_SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8, vision_use_head=False)


def char_tokenizer(
    *,
    specials: list[str] | dict[str, str],
    eos: str,
    pad: str,
    bos: str | None = None,
    unk: str = "<unk>",
    chat_template: str | None = None,
    add_bos_token: bool = False,
) -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one token per printable ASCII char (+ \\n, \\t), special tokens are
    AddedTokens (never split). A BPE model with an empty merge list is exactly a char tokenizer; the Fuse
    decoder joins tokens back without spaces.

    `specials` as a dict ({"image_token": "<image>", ...}) makes transformers 5 expose them as named
    attributes (tokenizer.image_token / tokenizer.image_token_id), which several processors look up.
    """
    vocab = {unk: 0}
    for ch in ["\n", "\t"] + [chr(i) for i in range(32, 127)]:
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    backend.decoder = decoders.Fuse()
    kwargs = dict(tokenizer_object=backend, unk_token=unk, eos_token=eos, pad_token=pad, extra_special_tokens=specials)
    if bos is not None:
        kwargs["bos_token"] = bos
    if add_bos_token:
        kwargs["add_bos_token"] = True
    tok = PreTrainedTokenizerFast(**kwargs)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


CHATML_QWEN_VL = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_ONEVISION = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_15 = (
    "{% for m in messages %}{{ m['role'].upper() + ': ' }}"
    "{% if m['content'] is string %}{{ m['content'] + ' ' }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
IDEFICS3 = (
    "<|begin_of_text|>{% for m in messages %}{{ m['role'] | capitalize }}"
    "{% if m['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% elif c['type'] == 'image' %}"
    "{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Gemma 3's own template (google/gemma-3-*-it): renders <bos> itself, the assistant turn is "model",
# an image is <start_of_image> (the processor expands it), every turn ends with <end_of_turn>
GEMMA3 = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
# InternVL-hf: ChatML, an image is <IMG_CONTEXT> (the processor expands it to <img> + context tokens + </img>)
CHATML_INTERNVL = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% elif c['type'] == 'video' %}<video>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

def qwen_tokenizer():
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    return char_tokenizer(specials=specials, eos="<|im_end|>", pad="<|endoftext|>", chat_template=CHATML_QWEN_VL)


def qwen_vl_common(tok, rope_theta=10000.0):
    ids = tok.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
        # head_dim = 64/4 = 16 -> rotary half-dim 8 = sum(mrope_section) (temporal, height, width)
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": [2, 3, 3]},
        bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
    )
    top = dict(
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    return text, top


def qwen_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # min_pixels == max_pixels == 32*32 pins every image to a 32x32 canvas; factor = patch*merge = 16
    return Qwen2VLImageProcessorPil(
        patch_size=8, temporal_patch_size=2, merge_size=2,
        size={"shortest_edge": IMAGE_SIZE * IMAGE_SIZE, "longest_edge": IMAGE_SIZE * IMAGE_SIZE},
    )


def build_qwen(config_name: str, model_name: str, processor_name: str, vision: dict):
    import transformers

    tok = qwen_tokenizer()
    proc = image_only(getattr(transformers, processor_name))(
        image_processor=qwen_image_processor(), tokenizer=tok, chat_template=CHATML_QWEN_VL)
    text, top = qwen_vl_common(tok)
    config = getattr(transformers, config_name)(text_config=text, vision_config=vision, **top)
    return {"model": getattr(transformers, model_name)(config), "processor": proc}


def build_qwen2_vl():
    # embed_dim = ViT width; hidden_size = the merger's OUTPUT width (must equal the text hidden size)
    return build_qwen("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor",
                      dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2))


def build_qwen2_5_vl():
    # hidden_size = ViT width, out_hidden_size = merger output (= text hidden); window_size is in pixels
    # (16 px = one merged 2x2 unit): block 0 runs windowed attention, block 1 full attention
    return build_qwen("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
                      dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1]))


def build_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tok = char_tokenizer(specials={"image_token": "<image>"}, bos="<s>", eos="</s>", pad="<pad>",
                         chat_template=LLAVA_15, add_bos_token=True)
    ip = LlavaImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    # CLIP has a CLS token (+1); "default" strategy drops it (-1): 32/8 squared = 16 image tokens
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_15)
    ids = tok.convert_tokens_to_ids
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<pad>")),
        image_token_index=ids("<image>"), image_seq_length=16,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(cfg)
    return {"model": model, "processor": proc}


def build_llava_onevision():
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionProcessor)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    tok = char_tokenizer(specials={"image_token": "<image>", "video_token": "<video>"}, eos="<|im_end|>",
                         pad="<|endoftext|>", chat_template=CHATML_ONEVISION)
    tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|endoftext|>"]}, replace_extra_special_tokens=False)
    ip = LlavaOnevisionImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=pinpoints)
    # SigLIP (no CLS), "full" strategy: 16 base tokens; anyres adds the 1x1 grid tile + newline per row
    proc = image_only(LlavaOnevisionProcessor)(
        image_processor=ip, tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", chat_template=CHATML_ONEVISION,
    )
    ids = tok.convert_tokens_to_ids
    cfg = LlavaOnevisionConfig(
        vision_config=dict(TINY_SIGLIP),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        image_token_index=ids("<image>"), video_token_index=ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
    )
    model = LlavaOnevisionForConditionalGeneration(cfg)
    return {"model": model, "processor": proc}


def idefics_like_tokenizer(chat_template, bos, eos, pad):
    named = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
             "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
    tok = char_tokenizer(specials=named, bos=bos, eos=eos, pad=pad, chat_template=chat_template)
    # the processors look these up with convert_tokens_to_ids and insert them as text; without them
    # in the vocab they would be spelled out char by char (and the id lookups return <unk>)
    tiles = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok.add_special_tokens({"extra_special_tokens": tiles}, replace_extra_special_tokens=False)
    return tok


def idefics_like_config(config_cls, tok, bos, pad, max_positions):
    """Idefics3 and SmolVLM: a tiny SigLIP-like encoder, pixel-shuffle connector (scale 2), Llama text model."""
    ids = tok.convert_tokens_to_ids
    return config_cls(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, bos_token_id=ids(bos),
                         eos_token_id=ids("<end_of_utterance>"), pad_token_id=ids(pad)),
        image_token_id=ids("<image>"), scale_factor=2, pad_token_id=ids(pad),
    )


def build_idefics3():
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = idefics_like_tokenizer(IDEFICS3, bos="<|begin_of_text|>", eos="<end_of_utterance>", pad="<pad>")
    ip = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                                   max_image_size={"longest_edge": IMAGE_SIZE})
    # image_seq_len = (image_size/patch)^2 / scale_factor^2 = 16/4 = 4
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3)
    model = Idefics3ForConditionalGeneration(idefics_like_config(Idefics3Config, tok, "<|begin_of_text|>", "<pad>", 512))
    return {"model": model, "processor": proc}


def build_smolvlm():
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
    from transformers.models.smolvlm import processing_smolvlm
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    template = processing_smolvlm.DEFAULT_CHAT_TEMPLATE
    tok = idefics_like_tokenizer(template, bos="<|im_start|>", eos="<end_of_utterance>", pad="<|im_end|>")
    # 32x32 input -> resized to longest_edge 64 -> split into 2x2 tiles of 32 + 1 global 32x32 image
    ip = SmolVLMImageProcessorPil(do_image_splitting=True, size={"longest_edge": 2 * IMAGE_SIZE},
                                  max_image_size={"longest_edge": IMAGE_SIZE})
    proc = image_only(SmolVLMProcessor)(
        image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=template)
    model = SmolVLMForConditionalGeneration(idefics_like_config(SmolVLMConfig, tok, "<|im_start|>", "<|im_end|>", 1024))
    return {"model": model, "processor": proc}


def build_paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = char_tokenizer(specials=[], bos="<bos>", eos="<eos>", pad="<pad>")
    ip = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    ip.image_seq_length = 16  # (32/8)^2; PaliGemmaProcessor refuses an image processor without it
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)  # adds <image> + 1024 <locXXXX> + 128 <segXXX>
    ids = tok.convert_tokens_to_ids
    cfg = PaliGemmaConfig(
        vision_config=dict(TINY_SIGLIP),
        text_config=dict(model_type="gemma", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=512, bos_token_id=ids("<bos>"), eos_token_id=ids("<eos>"),
                         pad_token_id=ids("<pad>")),
        image_token_index=ids("<image>"), vocab_size=len(tok), projection_dim=64, hidden_size=64,
    )
    model = PaliGemmaForConditionalGeneration(cfg)
    return {"model": model, "processor": proc}


def build_gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    # like the real Gemma tokenizer it adds <bos>; the template renders one too (the family's template_bos)
    tok = char_tokenizer(specials=named, bos="<bos>", eos="<eos>", pad="<pad>", chat_template=GEMMA3, add_bos_token=True)
    tok.add_special_tokens({"extra_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}, replace_extra_special_tokens=False)
    ip = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False)
    # SigLIP 32/8 = 4x4 patches, average-pooled by the projector to mm_tokens_per_image = 2x2 = 4 soft tokens
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=GEMMA3)
    ids = tok.convert_tokens_to_ids
    cfg = Gemma3Config(
        vision_config=dict(TINY_SIGLIP),
        # q_norm/k_norm stay (always built); layer 0 slides over a 16-token window, layer 1 attends fully
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                         sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                         max_position_embeddings=512, bos_token_id=ids("<bos>"),
                         eos_token_id=[ids("<eos>"), ids("<end_of_turn>")], pad_token_id=ids("<pad>")),
        mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    model = Gemma3ForConditionalGeneration(cfg)
    return {"model": model, "processor": proc}


def build_internvl():
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = char_tokenizer(specials=named, eos="<|im_end|>", pad="<|endoftext|>", chat_template=CHATML_INTERNVL)
    tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|endoftext|>"]}, replace_extra_special_tokens=False)
    # the processor crops to tiles by default: at most 2 tiles of 32x32 (+ a thumbnail when there are 2)
    ip = GotOcr2ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_patches=2)
    # InternViT 32/8 = 4x4 patches (CLS dropped), pixel shuffle 0.5 -> 2x2 = 4 tokens per tile
    proc = image_only(InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=4,
                                         chat_template=CHATML_INTERNVL)
    ids = tok.convert_tokens_to_ids
    cfg = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        image_token_id=ids("<IMG_CONTEXT>"), image_seq_length=4, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    model = InternVLForConditionalGeneration(cfg)
    return {"model": model, "processor": proc}


LLAMA_32_VISION = (  # the Llama 3.2 Vision template without its tool/system branches
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|image|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_mllama():
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tok = char_tokenizer(specials={"image_token": "<|image|>"}, bos="<|begin_of_text|>", eos="<|eot_id|>",
                         pad="<|finetune_right_pad_id|>", chat_template=LLAMA_32_VISION)
    tok.add_special_tokens({"extra_special_tokens": ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                                     "<|python_tag|>"]}, replace_extra_special_tokens=False)
    # one 32x32 tile per image (no tiling): aspect ratio [1, 1] only, id 1
    ip = MllamaImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=1)
    proc = MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=LLAMA_32_VISION)
    ids = tok.convert_tokens_to_ids
    cfg = MllamaConfig(
        # the projector reads the last hidden state + the intermediate layers' states concatenated: 32 * (1 + 2)
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=2, image_size=IMAGE_SIZE, patch_size=8, max_num_tiles=1,
                           supported_aspect_ratios=[[1, 1]], intermediate_layers_indices=[0, 1], vision_output_dim=96),
        # layer 0 self-attention, layer 1 cross-attention to the image
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         cross_attention_layers=[1], bos_token_id=ids("<|begin_of_text|>"),
                         eos_token_id=ids("<|eot_id|>"), pad_token_id=ids("<|finetune_right_pad_id|>")),
        image_token_index=ids("<|image|>"),
    )
    model = MllamaForConditionalGeneration(cfg)
    with torch.no_grad():  # the tanh gates start at 0 (an image-blind LLM); a trained checkpoint's are open
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(1.0)
                layer.cross_attn_mlp_gate.fill_(1.0)
    return {"model": model, "processor": proc}


def build_qwen3_vl():
    # hidden_size = ViT width, out_hidden_size = merger output (= text hidden); the learned position grid is
    # num_position_embeddings = 4x4 (resampled per image); deepstack_visual_indexes=[0]: block 0's features go
    # through model.visual.deepstack_merger_list.0 into LLM layer 0. Qwen3-VL reuses Qwen2-VL's image processor.
    import transformers

    tok = qwen_tokenizer()
    proc = image_only(transformers.Qwen3VLProcessor)(
        image_processor=qwen_image_processor(), tokenizer=tok, chat_template=CHATML_QWEN_VL)
    text, top = qwen_vl_common(tok)
    text.pop("bos_token_id")
    # explicit head_dim (the config's default is 128); 8 rotary frequencies, interleaved T/H/W sections
    text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                              "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0])
    config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **top)
    return {"model": transformers.Qwen3VLForConditionalGeneration(config), "processor": proc}


# GLM-4.1V's published chat template: the assistant turn renders ``msg.content`` as is (a string) and
# has no end-of-turn marker of its own (generation stops at <|endoftext|>, <|user|> or <|observation|>)
GLM4V = (
    "[gMASK]<sop>\n{%- for msg in messages %}\n    {%- if msg.role == 'system' %}\n<|system|>\n{{ msg.content }}\n"
    "    {%- elif msg.role == 'user' %}\n<|user|>{{ '\\n' }}\n\n        {%- if msg.content is string %}\n{{ msg.content }}\n"
    "        {%- else %}\n            {%- for item in msg.content %}\n"
    "                {%- if item.type == 'video' or 'video' in item %}\n<|begin_of_video|><|video|><|end_of_video|>\n"
    "                {%- elif item.type == 'image' or 'image' in item %}\n<|begin_of_image|><|image|><|end_of_image|>\n"
    "                {%- elif item.type == 'text' %}\n{{ item.text }}\n                {%- endif %}\n"
    "            {%- endfor %}\n        {%- endif %}\n    {%- elif msg.role == 'assistant' %}\n"
    "        {%- if msg.metadata %}\n<|assistant|>{{ msg.metadata }}\n{{ msg.content }}\n        {%- else %}\n"
    "<|assistant|>\n{{ msg.content }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_glm4v():
    import transformers
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    specials = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|begin_of_image|>",
                "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|video|>"]
    tok = char_tokenizer(specials=specials, eos="<|endoftext|>", pad="<|endoftext|>", chat_template=GLM4V)
    # smart_resize counts temporal_patch_size (2) frames: 2*32*32 pixels as both bounds pins a 32x32 canvas;
    # factor = patch*merge = 16 -> a 4x4 patch grid, 4 image tokens after the 2x2 downsample
    pixels = 2 * IMAGE_SIZE * IMAGE_SIZE
    ip = Glm4vImageProcessorPil(patch_size=8, temporal_patch_size=2, merge_size=2,
                                size={"shortest_edge": pixels, "longest_edge": pixels})
    proc = image_only(transformers.Glm4vProcessor)(image_processor=ip, tokenizer=tok, chat_template=GLM4V)
    ids = tok.convert_tokens_to_ids
    # head_dim 16, half of it rotary (GLM's partial_rotary_factor 0.5): 4 frequencies split T/H/W by mrope_section
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=ids("<|endoftext|>"),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": [2, 1, 1]})
    # hidden_size = ViT width; out_hidden_size = the downsample conv's and merger's width (= text hidden) and the
    # blocks' MLP width; intermediate_size = the merger's gate/up width;
    # image_size/patch_size = the 4x4 learned position grid (interpolated per image)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, image_size=IMAGE_SIZE,
                  patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
    config = transformers.Glm4vConfig(
        text_config=text, vision_config=vision, image_token_id=ids("<|image|>"), video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"), image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"), video_end_token_id=ids("<|end_of_video|>"))
    return {"model": transformers.Glm4vForConditionalGeneration(config), "processor": proc}




CHATML_MINICPM = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|image_pad|>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_minicpm(version: str):
    """MiniCPM-V 4.6, 4.7 and MiniCPM-OCR share one modelling code (4.7 and OCR subclass 4.6): a NaViT
    SigLIP-like tower with a window-attention merger after layer ``insert_layer_id``, an MLP merger, a
    Qwen3.5 text model. 4.7 adds canvas M-RoPE (marker token ids in its config); OCR reads with "4x"
    downsampling (skips the window merger, 4x the tokens). An image larger than ``scale_resolution``
    squared is a global view plus up to ``max_slice_nums`` slices: 32 px and 2 slices here (a 64x64
    image -> global 32x32 + two 16x48 slices)."""
    import transformers
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

    prefix = {"4_6": "MiniCPMV4_6", "4_7": "MiniCPMV4_7", "ocr": "MiniCPMOcr"}[version]
    downsample = "4x" if version == "ocr" else "16x"
    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "image_start_token": "<image>",
             "image_end_token": "</image>", "slice_start_token": "<slice>", "slice_end_token": "</slice>",
             "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>"}
    tok = char_tokenizer(specials=named, eos="<|im_end|>", pad="<|endoftext|>", chat_template=CHATML_MINICPM)
    tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|endoftext|>"]}, replace_extra_special_tokens=False)
    # MiniCPM-OCR's own image processor is torchvision-only; with small_image_upsize="always" (its default)
    # it resizes exactly as 4.6's PIL one, which serves all three here (downsample mode set per family).
    # patch 4, 32 px views: "16x" -> (32/4)^2 / 16 = 4 tokens per global view, "4x" -> 16
    ip = MiniCPMV4_6ImageProcessorPil(patch_size=4, scale_resolution=IMAGE_SIZE, max_slice_nums=2,
                                      downsample_mode=downsample)
    proc = image_only(getattr(transformers, f"{prefix}Processor"))(image_processor=ip, tokenizer=tok,
                                                                    chat_template=CHATML_MINICPM)
    ids = tok.convert_tokens_to_ids
    text = dict(
        model_type="qwen3_5_text", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        # hybrid like the real checkpoints (Gated DeltaNet linear_attn layers between full-attention ones)
        layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
        # rotary dim 16 * 0.5 = 8 -> 4 frequencies split over (t, h, w) interleaved
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=4)
    top = dict(text_config=text, vision_config=vision, insert_layer_id=0, downsample_mode=downsample,
               image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"))
    if version != "ocr":
        top["image_size"] = IMAGE_SIZE
    if version == "4_7":  # canvas M-RoPE pins these markers
        top.update(image_start_id=ids("<image>"), image_end_id=ids("</image>"), slice_start_id=ids("<slice>"),
                   slice_end_id=ids("</slice>"), newline_id=ids("\n"))
    config = getattr(transformers, f"{prefix}Config")(**top)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    return {"model": model, "processor": proc}


FAMILIES = {
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "llava": build_llava,
    "llava_onevision": build_llava_onevision,
    "idefics3": build_idefics3,
    "smolvlm": build_smolvlm,
    "paligemma": build_paligemma,
    "gemma3": build_gemma3,
    "internvl": build_internvl,
    "mllama": build_mllama,
    "qwen3_vl": build_qwen3_vl,
    "glm4v": build_glm4v,
    "minicpmv4_6": lambda: build_minicpm("4_6"),
    "minicpmv4_7": lambda: build_minicpm("4_7"),
    "minicpm_ocr": lambda: build_minicpm("ocr"),
}


def save(name: str, folder) -> None:
    """Build family ``name`` with seed 0 and save model + processor to ``folder``."""
    register_image_only_processors()
    torch.manual_seed(0)
    built = FAMILIES[name]()
    built["model"].save_pretrained(folder)
    built["processor"].save_pretrained(folder)
