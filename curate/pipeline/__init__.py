"""The run plan: stage declarations, the local run and re-cut, the books' accounting, recipes."""
