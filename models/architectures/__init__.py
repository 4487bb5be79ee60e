"""Every architecture module, imported so that their @register decorators fill the registry."""

from . import alexnet, inception, lenet, mobilenet, resnet, vgg

__all__ = ["alexnet", "inception", "lenet", "mobilenet", "resnet", "vgg"]
