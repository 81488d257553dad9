"""SpineLabel core: label every vertebra of a CT or MRI spine image. Never imports slicer, qt or ctk."""

__version__ = "0.1.0"
