"""A miniature SD1.5 trained here, to show that an adapter from this pack's trainer follows its
condition without downloading any weights (issue 16).

``shapes`` draws the data, ``stand_ins`` holds the weight-free VAE and text encoder,
``model_file`` builds, saves and loads the small SD1.5 UNet, ``build`` trains and caches it.
"""
