"""From loader batches to model inputs: device placement, CLIP on the fly, text encodings, sample grids."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import attrs
import torch
from accelerate.utils import broadcast_object_list

from ..common.images import resize
from ..common.progress import ProgressOutput
from ..config.root import TrainDecoderConfig

SAMPLE_SEED = 1234
"""Sample grids use fixed noise seeds (example `i`: this + i): grids of different steps differ only by the weights."""


@attrs.frozen
class SampleExamples:
    """A few fixed examples whose real and generated images are shown side by side all run long."""

    batch: Dict[str, Any]
    captions: List[str]


class BatchPreparer:
    """Turns a loader batch into the decoder's inputs on `device`."""

    def __init__(self, config: TrainDecoderConfig, *, device: torch.device):
        self.device = device
        self.config = config
        unet_options = [unet.options for unet in config.decoder.unets]
        self.needs_text = any(options.get("cond_on_text_encodings", False) for options in unet_options)
        text_dims = {options["text_embed_dim"] for options in unet_options if options.get("text_embed_dim")}
        self.text_embed_dim = text_dims.pop() if self.needs_text and len(text_dims) == 1 else None
        self.image_embed_dim = config.decoder.unets[0].image_embed_dim
        self.clip = None
        self._clip_config = config.decoder.clip

    def _ensure_clip(self) -> None:
        if self.clip is None:
            from ..clip import ClipLoadError, create_clip

            clip = create_clip(self._clip_config, device=self.device)
            if clip.image_embed_dim != self.image_embed_dim:
                raise ClipLoadError(
                    f"decoder.clip {self._clip_config.model} gives {clip.image_embed_dim}-dimensional image "
                    f"embeddings but decoder.unets[0].image_embed_dim is {self.image_embed_dim}"
                )
            if self.needs_text and self.text_embed_dim not in (None, clip.text_embed_dim):
                raise ClipLoadError(
                    f"decoder.clip {self._clip_config.model} gives {clip.text_embed_dim}-dimensional text "
                    f"encodings but the U-Nets' text_embed_dim is {self.text_embed_dim}"
                )
            self.clip = clip

    def clip_embedder(self):
        """`decoder.clip`, built now if not yet: the CLIP that embeds the batches, shared with the evaluation."""
        self._ensure_clip()
        return self.clip

    def prepare(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """Images and embeddings on the device; CLIP computes what the data does not carry."""
        image = batch["image"].to(self.device, non_blocking=True)
        if image.dtype == torch.uint8:  # the loader sends bytes; scaling on the device is free there
            image = image.float().div_(255)
        prepared: Dict[str, Any] = {"image": image, "caption": batch.get("caption", []), "key": batch.get("key", [])}
        if "image_embed" in batch:
            prepared["image_embed"] = batch["image_embed"].to(self.device, non_blocking=True).float()
        elif self._clip_config is not None:
            self._ensure_clip()
            prepared["image_embed"] = self.clip.embed_images(image)
        else:
            raise ValueError(
                "a batch has no image embeddings (keys: " + ", ".join(batch.get("key", [])[:3]) + ", ...): set "
                "data.img_embeddings_url, put img_emb.npy members in the shards, or configure decoder.clip"
            )
        if self.needs_text:
            if "text_embed" in batch:
                text = batch["text_embed"].to(self.device, non_blocking=True).float()
                # Precomputed text embeddings are pooled (B, D): one context token each.
                prepared["text_encodings"] = text.unsqueeze(1) if text.dim() == 2 else text
            elif self._clip_config is not None:
                self._ensure_clip()
                encoded = self.clip.embed_texts(list(batch["caption"]))
                prepared["text_encodings"] = encoded.text_encodings
                prepared["text_mask"] = encoded.text_mask
            else:
                raise ValueError(
                    "the U-Nets condition on text but a batch has no text embeddings and decoder.clip is not set"
                )
        return prepared

    # --- sample grids ------------------------------------------------------------------------

    def pick_examples(self, loaders, count: int) -> Dict[str, Dict[str, Any]]:
        """The first `count` examples of the train and test splits (val when test is empty), as read."""
        examples = {}
        for name, split in (("train", "train"), ("test", "test" if len(loaders["test"]) else "val")):
            loader = loaders[split]
            if count <= 0 or len(loader) == 0:
                continue
            loader.set_epoch(0)
            iterator = iter(loader)
            batch = next(iterator)
            iterator.close()  # stops the workers
            examples[name] = {key: value[:count] for key, value in batch.items()}
        return examples

    def share_examples(self, loaders, count: int, accelerator) -> Dict[str, SampleExamples]:
        """The main process's examples on every process, which each draw a share of every grid."""
        picked = self.pick_examples(loaders, count) if accelerator.is_main_process else None
        if accelerator.num_processes > 1:
            picked = broadcast_object_list([picked])[0]
        return {
            name: SampleExamples(self.prepare(batch), list(batch.get("caption", [""] * len(batch["image"]))))
            for name, batch in picked.items()
        }

    @torch.no_grad()
    def sample_grid(
        self,
        trainer,
        examples: SampleExamples,
        cond_scale: Sequence[float],
        unets: Sequence[int],
        *,
        on_unet_call: Optional[Callable[[int], None]] = None,
    ) -> Tuple[List[torch.Tensor], List[str]]:
        """Real and generated images interleaved, with captions, at the last sampled U-Net's size.

        Every process calls it and draws its share of the examples (a contiguous block, the last
        ones padded with the first example so every process runs the same U-Net calls); example
        `i` is drawn with noise seed `SAMPLE_SEED + i`, so a grid does not depend on the number
        of processes. `on_unet_call` runs before each U-Net call (the loop's stop check).
        """
        accelerator = trainer.accelerator
        batch, count = examples.batch, len(examples.captions)
        share = math.ceil(count / accelerator.num_processes)
        first = accelerator.process_index * share
        indices = [i if i < count else 0 for i in range(first, first + share)]
        mine = {key: _rows(value, indices) for key, value in batch.items()}
        start, stop = unets[0], unets[-1]
        size = self.config.decoder.image_sizes[stop - 1]
        with trainer.sampling_weights() as decoder, accelerator.autocast():
            generated = decoder.sample(
                image_embed=mine["image_embed"],
                text_encodings=mine.get("text_encodings"),
                text_mask=mine.get("text_mask"),
                cond_scale=list(cond_scale),
                start_at_unet_number=start,
                stop_at_unet_number=stop,
                image=mine["image"] if start > 1 else None,
                seed=[SAMPLE_SEED + i for i in indices],
                progress=ProgressOutput(
                    interval_s=self.config.tracker.progress_interval_s, enabled=accelerator.is_main_process
                ),
                on_unet_call=on_unet_call,
            )
        generated = generated.float().contiguous()
        if accelerator.num_processes > 1:
            generated = accelerator.gather(generated)
        generated = generated[:count]
        real = resize(batch["image"].float(), size)
        images: List[torch.Tensor] = []
        captions: List[str] = []
        for index, caption in enumerate(examples.captions):
            images += [real[index].clamp(0, 1).cpu(), generated[index].clamp(0, 1).cpu()]
            captions += [f"real: {caption}", f"generated: {caption}"]
        return images, captions


def _rows(value: Any, indices: List[int]) -> Any:
    """Rows `indices` of a batch entry (a tensor or a list)."""
    if isinstance(value, torch.Tensor):
        return value[torch.tensor(indices, device=value.device)]
    return [value[i] for i in indices]
