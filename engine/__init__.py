"""blockferry's runtime: process server, applier, agent and the tools around them."""
