"""The browser UI (``jaxdrag ui``): a Gradio page over a pipeline and a batching queue.

canvas   — image, mask and points out of the page's values, the points view, input checks
settings — the method settings panel, its defaults and what a request is built from
samples  — the toy world's samples and DragBench / Drag100 folders
batcher  — edits of every browser session queued and run as ``edit_batch`` calls
app      — the Gradio page and its handlers (gradio is imported only here)
"""

import sys

GRADIO_VERSION = "6.31.0"  # the version the browser test passes with (pyproject pins it)


def check_gradio() -> None:
    """Fail with one line when Gradio is missing; warn when it is not the tested version."""
    from ..errors import SettingsError

    try:
        import gradio
    except ImportError:
        raise SettingsError(f"the UI needs gradio: pip install 'gradio=={GRADIO_VERSION}'") from None
    if gradio.__version__ != GRADIO_VERSION:
        print(f"warning: gradio {gradio.__version__} is installed; the UI is tested with {GRADIO_VERSION}",
              file=sys.stderr)
