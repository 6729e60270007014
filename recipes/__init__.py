"""The bundled recipes and data: installed as the package ``nrt_mlx.recipes`` (see pyproject.toml).

Read them with ``importlib.resources.files("nrt_mlx.recipes")``, as ``nrt_mlx.quickstart`` does.
"""
