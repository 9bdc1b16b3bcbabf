"""report.html: the data it shows, its charts and its HTML."""
