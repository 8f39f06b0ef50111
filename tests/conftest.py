"""Shared pytest fixtures: tiny Qwen2-VL checkpoints built once per session."""

import pytest

from qvl.scripts.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """transformers-initialised weights, untied, official flat config, mrope (2, 3, 3)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), weights="transformers",
                                 tie_word_embeddings=False, layout="flat", mrope_section=(2, 3, 3))


@pytest.fixture(scope="session")
def tiny_ckpt_tied(tmp_path_factory):
    """Tied embeddings, transformers-5 nested config, mrope (4, 2, 2), special ids mid-vocab."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt_tied"), weights="transformers",
                                 tie_word_embeddings=True, layout="nested", mrope_section=(4, 2, 2),
                                 specials_in_middle=True)


@pytest.fixture(scope="session")
def tiny_ckpt_random(tmp_path_factory):
    """Weights written without transformers, under the official (pre-v5) key names."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt_random"), weights="random")


@pytest.fixture(scope="session")
def hf_processor():
    """Returns ``load(path) -> transformers.AutoProcessor``, usable without torchvision.

    Qwen2VLProcessor insists on a video processor, which needs torchvision; image and text
    paths never touch it, so None stands in for it while loading.
    """
    import importlib
    import importlib.util

    import transformers

    def load(path):
        return transformers.AutoProcessor.from_pretrained(path)

    if importlib.util.find_spec("torchvision") is not None:
        yield load
        return
    from transformers import ProcessorMixin

    # a plain `from ... import` can hand back the lazy module's placeholder: import the real one
    vpa = importlib.import_module("transformers.models.auto.video_processing_auto")
    auto_video = vpa.AutoVideoProcessor
    saved = vars(auto_video).get("from_pretrained")
    check = ProcessorMixin.check_argument_for_proper_class
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ProcessorMixin, "check_argument_for_proper_class",
                   lambda self, name, arg: None if arg is None and name == "video_processor"
                   else check(self, name, arg))
        # the placeholder raises on attribute reads, which MonkeyPatch does: swap by hand
        type.__setattr__(auto_video, "from_pretrained", classmethod(lambda cls, *a, **k: None))
        try:
            yield load
        finally:
            if saved is None:
                type.__delattr__(auto_video, "from_pretrained")
            else:
                type.__setattr__(auto_video, "from_pretrained", saved)
