"""Tables in, numeric arrays out: loading, built-in datasets, splits and preprocessing."""
