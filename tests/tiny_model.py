"""Tiny random-weight VALD-MD model folders built in code (diffusers' ``get_dummy_components`` style).

No hub access: the BERT tokenizer is built from a vocabulary this module writes. The model's input is 32 px,
1 channel; a folder is written with :func:`app.modelfolder.write_model_folder`, exactly as training does.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("normal chest x ray - scan healthy covid 19 viral pneumonia large lung opacity on the left right "
         "cardiomegaly lungs heart no findings with").split()


def tiny_components(seed: int = 0, *, text_hidden: int = 32, cross_dim: int = 32, vocab_dir: Path):
    """Seeded tiny (unet, vae, text_encoder, tokenizer). Image size 32 px, 1 channel, latents 4x16x16."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=2, norm_num_groups=32)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=32, sample_size=32)
    vocab_dir.mkdir(parents=True, exist_ok=True)
    vocab = vocab_dir / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizerFast.from_pretrained(vocab_dir, model_max_length=16)
    torch.manual_seed(seed)
    enc = BertModel(BertConfig(vocab_size=len(WORDS) + 5, hidden_size=text_hidden, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=37, max_position_embeddings=64),
                    add_pooling_layer=False).eval()
    return unet, vae, enc, tok


def write_tiny_model(out: Path, seed: int = 0) -> Path:
    """Write a complete tiny model folder (fp32) with a ``vald_md.json`` manifest and return its path."""
    from app.modelfolder import write_model_folder

    unet, vae, enc, tok = tiny_components(seed, vocab_dir=out.parent / f"{out.name}-vocab")
    write_model_folder(out, unet=unet, vae=vae, text_encoder=enc, tokenizer=tok, dtype=torch.float32,
                       manifest={"name": "tiny-test", "class_prompts": {"normal": "normal chest x ray"}})
    return out
