"""What the tests share: a fake vLLM, a real gateway on loopback, helpers to check answers."""
