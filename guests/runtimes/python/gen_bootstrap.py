# Embeds bootstrap.py in the glue as a C string (bootstrap.h).
src = open("bootstrap.py", "rb").read()
open("bootstrap.h", "w").write('static const char KILN_BOOTSTRAP[] = "%s";\n' % "".join("\\x%02x" % b for b in src))
