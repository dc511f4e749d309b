"""``ear-dist convert``: an original-format Janus-Pro checkpoint -> the transformers format.

DeepSeek's own repositories (``deepseek-ai/Janus-Pro-1B``, ``-7B``; the format the
official EAR code loads) store a ``multi_modality`` config and ``pytorch_model*.bin``
with other tensor names; ear-dist loads the transformers format
(``JanusForConditionalGeneration``). The conversion is transformers' own
``convert_janus_weights_to_hf.py``, called, not reimplemented: it is imported from the
installed transformers when present (a source install from its repository) or from the
file ``--converter`` names, because transformers' wheels and sdists do not ship their
conversion scripts. The converter would fetch the checkpoint from the Hub first; here the
files are already local, so that one step is pointed at the given directory. The result is
written under a temp name, loaded back through ``load_janus`` (weights against config,
the tokenizer round-trip check), and only then renamed into place.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import shutil
from pathlib import Path
from typing import Optional

import torch

from ear_dist.models.janus.bundle import ModelLoadError, is_original_format, load_janus, read_config_json
from ear_dist.paths import finish_dir, output_dir, temp_sibling
from ear_dist.errors import InputError

CONVERTER_MODULE = "transformers.models.janus.convert_janus_weights_to_hf"
CONVERTER_IN_REPOSITORY = "src/transformers/models/janus/convert_janus_weights_to_hf.py"


class ConvertError(InputError, ValueError):
    """A conversion that cannot run or whose result does not load; the message says what to do."""


def find_converter(path: Optional[str] = None):
    """transformers' Janus converter module: from ``path``, else from the installed transformers."""
    import transformers

    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConvertError(f"--converter {file}: no such file")
        spec = importlib.util.spec_from_file_location("ear_dist_janus_converter", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(CONVERTER_MODULE)
        except ImportError:
            raise ConvertError(
                f"transformers {transformers.__version__} is installed without its Janus converter ({CONVERTER_MODULE}): "
                "its wheels and sdists leave conversion scripts out. Take "
                f"{CONVERTER_IN_REPOSITORY} from the transformers repository at tag v{transformers.__version__} and "
                "pass it with --converter FILE, or download the already converted checkpoint "
                "(deepseek-community/Janus-Pro-1B or deepseek-community/Janus-Pro-7B)") from None
    if not callable(getattr(module, "convert_model", None)):
        raise ConvertError(f"{getattr(module, '__file__', module)}: has no convert_model(); expected transformers' "
                           f"{CONVERTER_IN_REPOSITORY}")
    return module


def convert(source, out, converter: Optional[str] = None, overwrite: bool = False) -> Path:
    """Convert the original-format checkpoint in ``source`` into a transformers-format directory ``out``.

    ``out`` follows the output-path rule (``ear_dist.paths``); it never is, holds or sits in ``source``. A
    converter that raises leaves nothing behind."""
    src = Path(source)
    out = output_dir(out, "convert", overwrite=overwrite,
                     protect=[("source checkpoint", source), ("converter", converter)])
    raw = read_config_json(src)
    if raw.get("model_type") == "janus":
        raise ConvertError(f"{src} is already in the transformers format (model_type 'janus'); use it as model.path")
    if not is_original_format(raw):
        raise ConvertError(f"{src / 'config.json'}: model_type {raw.get('model_type')!r} is not the original Janus format "
                           "('multi_modality' with language_config and gen_head_config)")
    if not any(src.glob("pytorch_model*.bin")):
        raise ConvertError(f"{src}: no pytorch_model*.bin weights (the original repositories ship them)")
    module = find_converter(converter)

    tmp = temp_sibling(out)
    # The converter's first step fetches the repository from the Hub; the files are already here.
    module.ensure_model_downloaded = lambda *args, **kwargs: str(src)
    accepted = inspect.signature(module.convert_model).parameters
    kwargs = {k: v for k, v in {"repo_id": src.name, "local_dir": str(src), "output_dir": str(tmp),
                                "safe_serialization": True}.items() if k in accepted}
    default_dtype = torch.get_default_dtype()
    try:
        module.convert_model(**kwargs)
    except Exception as e:  # the converter is transformers' script, not ours: its failure is the input's
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConvertError(f"{getattr(module, '__file__', module)}: the converter failed on {src}: "
                           f"{type(e).__name__}: {e}") from e
    finally:
        torch.set_default_dtype(default_dtype)  # the converter sets float16 process-wide
    try:
        load_janus(str(tmp), device="cpu", dtype="bfloat16")
    except ModelLoadError as e:
        raise ConvertError(f"the converted model does not load ({e}); it is left in {tmp} for inspection") from e
    return finish_dir(tmp, out, "convert")
