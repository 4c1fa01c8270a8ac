"""tandem: export, compile and serve a two-stage text-to-image model (MoE reasoning -> UNet refinement).

Layers, bottom to top. A module imports only from its own layer or a lower one, and no two modules
import each other, directly or around a loop (``tests/test_layers.py`` reads this list and checks
every import, at the top of a file or inside a function). A name stands for a module or a package;
the longest name that matches a module decides its layer.

    errors util
    config tokenizer scene_tokens sampling
    data models stages memory
    formats
    decoding
    runtimes
    pipeline scheduler parallel
    export
    serving eval
    toolchains compiler preflight
    deploy bench train
    cli __main__

``formats`` is what travels between commands (export and compiled manifests, the build manifest,
targets, the folder layout, the names on the wire): every writer and every reader imports it.
"""

__version__ = "0.1.0"
