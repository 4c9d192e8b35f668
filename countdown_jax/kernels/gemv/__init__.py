"""y = x @ W for a few rows of x (decode projections): reference, api (implementation=),
Pallas GPU."""
