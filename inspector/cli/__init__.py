"""The ``inspector`` command: :mod:`.main` parses and dispatches; :mod:`.commands` holds one module
per subcommand."""
