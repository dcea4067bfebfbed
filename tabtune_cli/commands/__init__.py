"""One module per ``tabtune`` command."""
