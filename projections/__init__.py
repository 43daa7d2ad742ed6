"""Read models of tenant configuration, chosen per key by its tag (see ``router``)."""
