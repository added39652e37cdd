"""A tiny ViT with the transformers 4.x module layout (written here: the installed transformers is 5.x).

Module names and forward structure follow 4.x ``modeling_vit.py``: ``vit.encoder.layer.{i}`` with
``attention.attention.{query,key,value}``, ``attention.output.{dense,dropout}`` (no residual),
``intermediate.dense`` and ``output.{dense,dropout}`` -- where ``ViTOutput`` adds the MLP residual
inside its own forward, while ``ViTLayer`` adds the attention residual. The embeddings are the
installed ones (their names did not change).
"""

import math

from torch import nn
from transformers import ViTConfig
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.vit.modeling_vit import ViTEmbeddings


class SelfAttention4(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.num_attention_heads = c.num_attention_heads
        self.head_size = c.hidden_size // c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size, bias=c.qkv_bias)
        self.key = nn.Linear(c.hidden_size, c.hidden_size, bias=c.qkv_bias)
        self.value = nn.Linear(c.hidden_size, c.hidden_size, bias=c.qkv_bias)
        self.dropout = nn.Dropout(c.attention_probs_dropout_prob)

    def split(self, x):
        return x.view(*x.shape[:-1], self.num_attention_heads, self.head_size).permute(0, 2, 1, 3)

    def forward(self, hidden_states):
        q, k, v = (self.split(f(hidden_states)) for f in (self.query, self.key, self.value))
        probs = self.dropout((q @ k.transpose(-1, -2) / math.sqrt(self.head_size)).softmax(-1))
        ctx = (probs @ v).permute(0, 2, 1, 3).flatten(2)
        return (ctx,)


class SelfOutput4(nn.Module):  # 4.x ViTSelfOutput: no residual here
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.dropout(self.dense(hidden_states))


class Attention4(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = SelfAttention4(c)
        self.output = SelfOutput4(c)

    def forward(self, hidden_states):
        self_outputs = self.attention(hidden_states)
        return (self.output(self_outputs[0], hidden_states),) + self_outputs[1:]


class Intermediate4(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x):
        return nn.functional.gelu(self.dense(x))


class Output4(nn.Module):  # 4.x ViTOutput: adds the MLP residual itself
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.intermediate_size, c.hidden_size)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.dropout(self.dense(hidden_states)) + input_tensor


class Layer4(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = Attention4(c)
        self.intermediate = Intermediate4(c)
        self.output = Output4(c)
        self.layernorm_before = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, hidden_states):
        attention_output = self.attention(self.layernorm_before(hidden_states))[0]
        hidden_states = attention_output + hidden_states
        layer_output = self.output(self.intermediate(self.layernorm_after(hidden_states)), hidden_states)
        return (layer_output,)


class Encoder4(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer = nn.ModuleList(Layer4(c) for _ in range(c.num_hidden_layers))


class Model4(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings = ViTEmbeddings(c)
        self.encoder = Encoder4(c)
        self.layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class ViTForImageClassification4(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.config = c
        self.vit = Model4(c)
        self.classifier = nn.Linear(c.hidden_size, c.num_labels)

    def forward(self, pixel_values, labels=None):
        h = self.vit.embeddings(pixel_values)
        for layer in self.vit.encoder.layer:
            h = layer(h)[0]
        logits = self.classifier(self.vit.layernorm(h)[:, 0])
        return ImageClassifierOutput(logits=logits)


def to_4x_layout(model_5x) -> ViTForImageClassification4:
    """The same weights in the 4.x layout (eval mode)."""
    from consolidator_hf.targets import rename_4_to_5

    m4 = ViTForImageClassification4(model_5x.config)
    sd5 = model_5x.state_dict()
    sd4 = {k: sd5[rename_4_to_5(k, "vit")] for k in m4.state_dict()}
    m4.load_state_dict(sd4)
    return m4.eval()
