from datamodules.sampling import EpochShuffle


def test_epoch_order_depends_only_on_seed_and_epoch():
    long_run = EpochShuffle(50, seed=3)
    orders = []
    for epoch in range(3):
        long_run.set_epoch(epoch)
        orders.append(list(long_run))
    resumed = EpochShuffle(50, seed=3)
    resumed.set_epoch(2)
    assert list(resumed) == orders[2]  # a resumed run sees what an uninterrupted one saw
    assert orders[0] != orders[1] and sorted(orders[0]) == list(range(50))
    assert list(EpochShuffle(50, seed=4)) != orders[0]
    assert len(resumed) == 50
