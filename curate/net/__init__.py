"""HTTP for the download stage: the SSRF-guarded fetch session and its connections."""
