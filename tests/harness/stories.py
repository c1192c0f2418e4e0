"""Stories the tests share."""

# Two characters, an [NC] panel and a two-character panel: 7 panels (0-based), identity panels
# (2 each) Bob 0, 2 and Alice 1, 5.
BOB_AND_ALICE = """
[Bob] a man in a red coat
[Alice] a woman in a green dress
[Bob] walks in the park
[Alice] reads a book
[Bob] runs to the station
[NC] a quiet forest at dawn
[Bob] and [Alice] talk at a cafe
[Alice] sleeps on the sofa
[Bob] eats an apple
"""
