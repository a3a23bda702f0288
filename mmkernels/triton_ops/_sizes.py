"""Block-size arithmetic for the launchers, in plain Python: triton.next_power_of_2 and triton.cdiv are jit-aware
wrappers that cost microseconds per call, paid on every launch."""


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
