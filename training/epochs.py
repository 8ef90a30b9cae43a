"""What one round trains on: `epochs` passes over the train loader, also less than one.

With `epochs: 0.5` a round trains on half of a site's batches and the next round on the other
half: the rounds cut one endless stream of epochs (each a fresh shuffle of the loader) into
slices of round(epochs x batches per epoch) batches. Whole numbers keep the loader as it is.
More, shorter rounds at the same passes over the data let the sites drift apart less between
two averagings (README, "Federated training quality").
"""


class RoundBatches:
    """The train function's (loader, epochs) for each round of one site."""

    def __init__(self, loader, epochs):
        self.loader, self.epochs = loader, epochs
        self._current_pass = None  # the iterator of the epoch the last round stopped in

    @property
    def whole(self):
        return float(self.epochs).is_integer()

    def for_round(self):
        """(loader, epochs) to train one round on: the loader itself for whole epochs, else a
        one-pass loader over the stream's next slice."""
        if self.whole:
            return self.loader, int(self.epochs)
        steps = max(1, round(self.epochs * len(self.loader)))
        return EpochSlice(self, steps), 1

    def next_batch(self):
        batch = next(self._current_pass, None) if self._current_pass is not None else None
        if batch is None:  # the epoch is used up: the next one (the loader reshuffles)
            self._current_pass = iter(self.loader)
            batch = next(self._current_pass, None)
            if batch is None:
                raise ValueError("the train loader yielded no batches")
        return batch


class EpochSlice:
    """`steps` batches of a RoundBatches stream, iterated once like a loader. Attributes
    other than iteration and len (dataset, batch_size) are the underlying loader's, for train
    functions that read them."""

    def __init__(self, stream, steps):
        self._stream, self._steps = stream, steps

    def __len__(self):
        return self._steps

    def __iter__(self):
        for _ in range(self._steps):
            yield self._stream.next_batch()

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._stream.loader, name)
