"""Link composition: the ``+-N`` families built from the published ``+1`` cells."""
