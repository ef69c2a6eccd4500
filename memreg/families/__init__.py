"""Model families behind one seam: SD 1.x, SD 2.x and SDXL.

* :mod:`~memreg.families.conditioning` - what the UNet is conditioned on (:class:`Conditioning`:
  embeddings plus added conditioning), batched as one, and :func:`denoise`, the one UNet call;
* :mod:`~memreg.families.base` - the :class:`ModelFamily` protocol and the loaded :class:`Components`;
* :mod:`~memreg.families.sd` (SD 1.x, 2.x), :mod:`~memreg.families.sdxl` (SDXL) - the families;
* :mod:`~memreg.families.registry` - ``FAMILIES`` and the detection (:func:`detect_family`,
  :func:`family_of`), a loaded pipeline's parts (:func:`pipeline_components`);
* :mod:`~memreg.families.sdxl_kohya` - SDXL LoRA keys by the SGM UNet's names, as kohya writes them.
"""

from memreg.families.base import Components, ModelError, ModelFamily, parse_dtype
from memreg.families.conditioning import (Cond, Conditioning, cat_conditioning, denoise, embeds_of,
                                          unconditional_for, unet_kwargs, with_embeds)
from memreg.families.registry import (BY_NAME, FAMILIES, detect_family, family_named, family_of, pipeline_components,
                                      prompt_encoder)

__all__ = ["BY_NAME", "Components", "Cond", "Conditioning", "FAMILIES", "ModelError", "ModelFamily", "cat_conditioning",
           "denoise", "detect_family", "embeds_of", "family_named", "family_of", "parse_dtype", "pipeline_components",
           "prompt_encoder", "unconditional_for", "unet_kwargs", "with_embeds"]
