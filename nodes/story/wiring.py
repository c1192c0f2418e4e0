"""The one advice for a latent batch that does not match the story (said by the sampler wrapper,
the story sub-calls and Comic Page; the editor's badge says it in short)."""

BATCH_WIRING = (
    "Give the sampler Story Latent's latent, or wire Story Prompts' panel_count into the latent's batch_size "
    "(Empty Latent Image), and connect the same Story Prompts node's story output to Consistent Self-Attention."
)
