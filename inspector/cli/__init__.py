"""The ``inspector`` command: :mod:`.main` parses and dispatches; :mod:`.commands` holds one module
per subcommand. Commands from above the library (the web station's ``serve``, in ``app/serve.py``)
join through the ``inspector.commands`` entry-point group, so the library never imports them."""
