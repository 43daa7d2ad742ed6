"""Read model adapters behind the :class:`~projections.stores.base.ConfigStore` port."""
