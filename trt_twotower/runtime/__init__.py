"""The runtime: tower executors behind one protocol and the two-device TwoTower session."""
