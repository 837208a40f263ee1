"""qjax's implementation. Not public: import from :mod:`qjax` and its public modules."""
