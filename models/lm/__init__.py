"""Language models: the LitGPT-style GPT and the Phase 1 / Phase 2 efficiency-engine LMs."""
