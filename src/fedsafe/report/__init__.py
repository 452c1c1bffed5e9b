"""Tables, plots and a self-contained HTML page from run directories."""
