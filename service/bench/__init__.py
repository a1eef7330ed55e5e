"""`moe-serve bench`: how close the engine and the server come to the machine's limit, side by side."""
