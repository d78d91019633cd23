"""The apprentice: a U-Net with demonstration-attention layers that generates a new subject in
context from 1-8 (image, caption) demonstrations, without tuning (SuTI).

>>> from apprentice import ApprenticePipeline
>>> pipe = ApprenticePipeline.from_pretrained("my-apprentice")
>>> pipe("a photo in the snow", demo_images=[...], demo_captions=[...]).images
"""

from apprentice.adapter import DemoAttentionAdapter
from apprentice.attention import DemoAttnProcessor, DemoContext, PassthroughProcessor
from apprentice.pipeline import ApprenticePipeline

__all__ = ["ApprenticePipeline", "DemoAttentionAdapter", "DemoAttnProcessor", "DemoContext", "PassthroughProcessor"]
