"""Token counting shared by every wire format.

A token is a run of word characters or a single other non-space character, so every
token is at least one character and therefore at least one UTF-8 byte. The broker
relies on that: it uses the UTF-8 byte length of a text as an upper bound on its
token count.
"""

import re
from collections import deque
from itertools import islice

TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")

# Fixed cost of one image (or other inline media part) in a prompt.
IMAGE_TOKENS = 85
# Added per message, and once per prompt for priming the reply.
MESSAGE_OVERHEAD_TOKENS = 4
REPLY_PRIMING_TOKENS = 3


def count_tokens(text: str) -> int:
    """Return the number of tokens in ``text``."""
    return len(TOKEN_PATTERN.findall(text))


def truncate_to_tokens(text: str, max_tokens: int) -> tuple[str, bool]:
    """Cut ``text`` after its first ``max_tokens`` tokens.

    Returns the kept text and whether anything was cut. Whitespace after the last kept
    token is dropped with the rest.
    """
    if max_tokens <= 0:
        return "", TOKEN_PATTERN.search(text) is not None
    # deque with maxlen 1 runs the iterator in C and keeps only the last match.
    last_kept = deque(islice(TOKEN_PATTERN.finditer(text), max_tokens), maxlen=1)
    if not last_kept:
        return text, False
    end = last_kept[0].end()
    if TOKEN_PATTERN.search(text, end) is None:
        return text, False
    return text[:end], True


def split_into_chunks(text: str, group_sizes: list[int]) -> list[str]:
    """Split ``text`` into stream chunks of whole tokens.

    ``group_sizes`` is cycled to pick how many tokens go into each chunk. Chunks break
    at token ends, so the whitespace before a token travels with it, and joining the
    chunks gives back ``text`` exactly.
    """
    ends = [match.end() for match in TOKEN_PATTERN.finditer(text)]
    chunks = []
    previous = 0
    position = 0
    turn = 0
    while True:
        position += group_sizes[turn % len(group_sizes)]
        turn += 1
        if position >= len(ends):
            if previous < len(text) or not chunks:
                chunks.append(text[previous:])
            return [chunk for chunk in chunks if chunk]
        boundary = ends[position - 1]
        chunks.append(text[previous:boundary])
        previous = boundary
