"""An independent, functional AstroMAE forward pass over a raw state_dict, for tests.

Written straight from the architecture description (not from cai.model): explicit
attention arithmetic, the PCM output added in place to the patch tokens after the
attention residual, Inception branches as plain conv/BN/ReLU calls. If cai.model and
this disagree, one of them misreads the architecture.
"""

import torch
import torch.nn.functional as F


def _bn(x, sd, prefix, eps=1e-5):
    return F.batch_norm(
        x,
        sd[prefix + "running_mean"],
        sd[prefix + "running_var"],
        sd[prefix + "weight"],
        sd[prefix + "bias"],
        training=False,
        eps=eps,
    )


def _conv_bn_relu(x, sd, prefix, padding):
    x = F.conv2d(
        x, sd[prefix + "conv.weight"], sd[prefix + "conv.bias"], padding=padding
    )
    return F.relu(_bn(x, sd, prefix + "bn."))


def _inception(x, sd, prefix, with_5x5=True):
    b1 = _conv_bn_relu(x, sd, prefix + "branch1.", 0)
    b2 = _conv_bn_relu(x, sd, prefix + "branch2.0.", 0)
    b2 = _conv_bn_relu(b2, sd, prefix + "branch2.1.", 1)
    b3 = _conv_bn_relu(x, sd, prefix + "branch3.0.", 0)
    b3 = _conv_bn_relu(b3, sd, prefix + "branch3.1.", 2)
    b4 = F.max_pool2d(x, 3, stride=1, padding=1)
    b4 = _conv_bn_relu(b4, sd, prefix + "branch4.1.", 0)
    return torch.cat([b1, b2, b3, b4] if with_5x5 else [b1, b2, b4], 1)


def _linear(x, sd, prefix):
    return F.linear(x, sd[prefix + "weight"], sd[prefix + "bias"])


def _block(x, sd, p, heads):
    b, n, c = x.shape
    # PCM on the block input's patch tokens, as a 4x4 map (row-major tokens).
    grid = x[:, 1:, :].reshape(b, 4, 4, c).permute(0, 3, 1, 2)
    y = F.conv2d(grid, sd[p + "PCM.0.weight"], sd[p + "PCM.0.bias"], padding=1)
    y = F.silu(_bn(y, sd, p + "PCM.1."))
    y = F.conv2d(y, sd[p + "PCM.3.weight"], sd[p + "PCM.3.bias"], padding=1)
    conv = y.permute(0, 2, 3, 1).reshape(b, n - 1, c)
    # Attention, written out.
    h = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-5)
    qkv = F.linear(h, sd[p + "attn.qkv.weight"])
    qkv = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    x = x + _linear(out, sd, p + "attn.proj.")
    x = x.clone()
    x[:, 1:] = x[:, 1:] + conv
    h = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-5)
    h = _linear(F.gelu(_linear(h, sd, p + "mlp.fc1.")), sd, p + "mlp.fc2.")
    return x + h


def reference_forward(sd, image, magnitudes, heads=8):
    """Predicted redshift [B] from a state_dict without the 'module.' prefix."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    x = F.conv2d(
        image, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=8
    )
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd["pos_embed"]
    for i in range(depth):
        x = _block(x, sd, f"blocks.{i}.", heads)
    v = x[:, 1:, :].mean(1)
    v = F.layer_norm(v, (v.shape[-1],), sd["fc_norm.weight"], sd["fc_norm.bias"], 1e-6)
    v = _linear(v, sd, "head.")
    v = _linear(F.relu(_linear(v, sd, "vit_block.0.")), sd, "vit_block.2.")

    p = "inception_model.vis_inception."
    y = F.conv2d(image, sd[p + "0.weight"], sd[p + "0.bias"])
    y = F.avg_pool2d(y, 2)
    y = _inception(y, sd, p + "2.")
    y = _inception(y, sd, p + "3.")
    y = F.avg_pool2d(y, 2)
    y = _inception(y, sd, p + "5.")
    y = _inception(y, sd, p + "6.")
    y = F.avg_pool2d(y, 2)
    y = _inception(y, sd, p + "8.", with_5x5=False).flatten(1)
    y = _linear(F.relu(_linear(y, sd, p + "10.")), sd, p + "12.")

    m = magnitudes
    for i in (0, 2, 4, 6):
        m = F.relu(_linear(m, sd, f"inception_model.magnitude_block.{i}."))
    m = _linear(m, sd, "inception_model.magnitude_block.8.")

    z = torch.cat([v, y, m], 1)
    z = _linear(F.relu(_linear(z, sd, "concat_block.0.")), sd, "concat_block.2.")
    return z[:, 0]
