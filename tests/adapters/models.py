"""Tiny random-weight diffusers models built from configs (no hub downloads) and their inputs."""
import torch


def tiny_flux(seed=0, layers=1, single_layers=1, heads=2, head_dim=16, dtype=torch.float32):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(seed)
    m = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=layers, num_single_layers=single_layers,
                               attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
                               pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    return (m if dtype == torch.float32 else m.to(dtype)).eval()


def image_ids(H, W, frame=0, dtype=torch.float32):
    ids = torch.zeros(H * W, 3, dtype=dtype)
    ids[:, 0] = frame
    ids[:, 1] = torch.arange(H).repeat_interleave(W)
    ids[:, 2] = torch.arange(W).repeat(H)
    return ids


def flux_inputs(H, W, text=5, batch=1, dtype=torch.float32):
    return dict(hidden_states=torch.randn(batch, H * W, 8, dtype=dtype),
                encoder_hidden_states=torch.randn(batch, text, 32, dtype=dtype),
                pooled_projections=torch.randn(batch, 16, dtype=dtype),
                timestep=torch.full((batch,), 0.5, dtype=dtype),
                img_ids=image_ids(H, W, dtype=dtype), txt_ids=torch.zeros(text, 3, dtype=dtype))


def tiny_wan(seed=0, layers=2, heads=2, head_dim=12, dtype=torch.float32):
    from diffusers import WanTransformer3DModel
    torch.manual_seed(seed)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                              in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                              num_layers=layers, cross_attn_norm=True, rope_max_seq_len=32)
    return (m if dtype == torch.float32 else m.to(dtype)).eval()


def wan_inputs(T, H, W, text=6, batch=1, dtype=torch.float32):
    """Latent (B, 4, T, 2H, 2W): a (T, H, W) token grid after (1, 2, 2) patching."""
    return dict(hidden_states=torch.randn(batch, 4, T, 2 * H, 2 * W, dtype=dtype),
                timestep=torch.full((batch,), 500, dtype=torch.long),
                encoder_hidden_states=torch.randn(batch, text, 16, dtype=dtype))


def tiny_unet(seed=0, dtype=torch.float32):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    m = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                             block_out_channels=(32, 64), norm_num_groups=16,
                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                             cross_attention_dim=24, attention_head_dim=8)
    return (m if dtype == torch.float32 else m.to(dtype)).eval()


def assert_same_param_grads(adapted, reference, atol=1e-4):
    """Every parameter gradient of `reference` equals the adapted model's (parameters the adapter
    added, like CLEAR's pooling weights, are not in the reference); at least one is checked."""
    params = dict(adapted.named_parameters())
    checked = 0
    for name, p in reference.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(params[name].grad, p.grad, atol=atol, rtol=atol, msg=name)
            checked += 1
    assert checked > 10, f"only {checked} parameter gradients compared"
