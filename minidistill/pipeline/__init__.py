"""The run around the stages: ``context`` (``Run``, what every stage gets), ``build`` (teacher and
student), ``launch`` (device, precision, the ``accelerate launch --cpu`` relaunch) and ``outputs``
(output_dir checks, resume/overwrite, recipe.yaml). ``minidistill.run`` drives them."""
